"""``python -m tram.experiments.assets [names]``: fetch and convert offline assets."""

from tram.experiments.assets import main

raise SystemExit(main())
