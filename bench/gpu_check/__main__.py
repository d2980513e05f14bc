"""`python -m bench.gpu_check`: runs `main.main` and exits with its status."""

from bench.gpu_check.main import main

raise SystemExit(main())
