from clipcap_cli.cli.entry import main

main()
