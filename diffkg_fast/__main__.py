from diffkg_fast.cli import main

raise SystemExit(main())
