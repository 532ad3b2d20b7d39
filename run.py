"""VLMEvalKit's run.py with the hybrid-vlm models registered. See vlmeval_plugin/README.md.

    python run.py --data MMBench_DEV_EN COCO_VAL --model llava_v1.5_7b_hybrid
    python run.py            # the bundled CPU demo: the trained testbed on TinyMMBench + TinyCOCO
"""

import sys

from vlmeval_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
