from safevid.cli import main

raise SystemExit(main())
