from coral_fast.cli import main

raise SystemExit(main())
