"""The OD-MoE cluster: a coordinator runs the trunk; workers load, compute and drop experts just in time."""
