from draftalign.cli import main

raise SystemExit(main())
