"""Training stages: the torch.distributed launch and runtime layer, then one trainer shared by every stage."""
