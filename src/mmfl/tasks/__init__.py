"""What is trained: datasets, partitions across clients, model factories."""
