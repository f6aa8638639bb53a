"""Puts the user's config folders ahead of robust's own on Hydra's search path (a Hydra SearchPathPlugin).

`robust` sets ROBUST_CONFIG_DIRS (os.pathsep-separated) to `./conf` when the current folder has one, then every
`--config-dir` / `-cd`. Hydra itself appends such folders after the package's configs, so a user's
`conf/model/fc200_200_10.yaml` could add keys but never replace the shipped file; prepended, the user's file wins
and the shipped one stays in the installed package untouched.
"""

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class RobustSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folders = [d for d in os.environ.get("ROBUST_CONFIG_DIRS", "").split(os.pathsep) if d]
        for folder in reversed(folders):  # the first named is searched first
            search_path.prepend(provider="robust-user", path=f"file://{folder}")
