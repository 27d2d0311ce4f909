from distsgd.train.cli import main

raise SystemExit(main())
