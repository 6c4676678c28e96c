from cltrace.cli import main

raise SystemExit(main())
