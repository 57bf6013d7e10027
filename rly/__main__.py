from rly.cli import main

raise SystemExit(main())
