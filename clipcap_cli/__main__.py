from clipcap_cli.entry import main

main()
