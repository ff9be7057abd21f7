from sae_cli import main

main()
