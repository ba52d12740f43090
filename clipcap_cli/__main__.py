from clipcap_cli.cli import main

main()
