from gated.cli import main

raise SystemExit(main())
