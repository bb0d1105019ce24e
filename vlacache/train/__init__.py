"""Training room: scripted-expert demonstrations (expert, demos); behaviour cloning comes later."""
