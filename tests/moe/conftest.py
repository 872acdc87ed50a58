import sys
from pathlib import Path

# Lets the MoE tests import their shared naive implementations as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))
