"""The device profiles shipped with edgekit (TOML files in this folder, read by edge_agent.profiles)."""
