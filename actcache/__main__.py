from actcache.cli import main

main()
