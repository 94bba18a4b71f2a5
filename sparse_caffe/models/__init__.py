"""The models: nets and their prototxts, weights (SkimCaffe's, synthetic, open_nsfw converted from
ONNX), the images they are fed, the net rebuilt in PyTorch, the memory a net needs."""
