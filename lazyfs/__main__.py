from lazyfs.cli import main

raise SystemExit(main())
