from spdkernels.bench.cli import main

raise SystemExit(main())
