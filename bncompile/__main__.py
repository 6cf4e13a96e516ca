from bncompile.cli import main

raise SystemExit(main())
