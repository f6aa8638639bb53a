"""Layer 7: runs into results: collection, exports, paper tables, the report, multirun and tracking callbacks."""
