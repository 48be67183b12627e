"""Model definitions and loading: ResNets safe for attribution, VGGFace2 import, checkpoints, cards, face parser."""
