"""`python -m inferbridge` is the same as the `inferbridge` command."""

from inferbridge.cli import main

raise SystemExit(main())
