"""Where commands run, one module per job:

- `connect`: the Ray connection (a local Ray on loopback only; it sets the switch when imported,
  so it is imported before anything imports ray), and whether a request fits its nodes;
- `task`: a Ray task that streams progress and fails within a bound when its Ray disappears;
- `signals`: the one stop-signal handler of the sweep and the cook (interrupt once, then a
  bounded cleanup);
- `terminal`: where a command's output goes (its own lines on the terminal, the detail in a log).

May import: nothing else of the package (ray only inside its functions).
"""
