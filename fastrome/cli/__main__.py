from fastrome.cli import main

raise SystemExit(main())
