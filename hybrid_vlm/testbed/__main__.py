"""python -m hybrid_vlm.testbed {train,calibrate} ... (see hybrid_vlm.testbed)."""

from .cli import main

main()
