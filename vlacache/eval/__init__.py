"""The evaluation room: everything that turns a backbone + cache policies into numbers on disk.

- `runner`: `vlacache run`, every policy over an env's episodes, resumable, sharded with Lightning Fabric;
- `results`: the output directory's files: episode JSONL (torn-line repair), `run.json` (fingerprints),
  `run.lock` (one run per directory), `--restart`'s move-aside;
- `fingerprint`: what decides an episode's outcome (backbone + checkpoint identity, policy, env, the code of the
  components in use);
- `code_identity`: which code a result was made with (a component's own code; the build: version, sources, commit);
- `report`: the paper's table and plots from episode records;
- `bench`: `vlacache bench`, baseline vs cached inference over one frame sequence;
- `recording`: `vlacache record`, one episode's observations for the replay env.

Nothing is imported here: `import vlacache` stays light, and each command imports what it needs.
"""
