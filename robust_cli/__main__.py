from robust_cli.cli import main

main()
