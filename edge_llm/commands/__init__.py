"""The commands that are only commands: their argument handling and what they print (`cli.py` maps
each name to its module). The core they share lives one level up; nothing there imports these.
pull, convert, quantize, imatrix, info and models are commands too, but the server and the other
commands use their work, so they stay in the core with their `main`."""
