"""`python -m fusedopt [demo] [options]`: the main job, the AdamW vs AdamC demo (fusedopt.demo)."""
import sys

from fusedopt.demo import main

args = sys.argv[1:]
# "demo" is the only command; accepting it keeps room for more without breaking this call form.
if args and args[0] == "demo":
    args = args[1:]
main(args)
