"""Where commands run: the Ray connection (a local Ray on loopback only), a task that streams
progress and fails within a bound when its Ray disappears, stop signals, and where a command's
output goes (`cluster`).

May import: nothing else of the package (ray only inside its functions).
"""
