from filefeed.cli import main

main()
