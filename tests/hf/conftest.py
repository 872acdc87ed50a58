import sys
from pathlib import Path

# Lets the test modules here import hf_tiny (tiny random transformers models).
sys.path.insert(0, str(Path(__file__).parent))
