from maxfl.cli import main

main()
