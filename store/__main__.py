from store.cli import main

raise SystemExit(main())
