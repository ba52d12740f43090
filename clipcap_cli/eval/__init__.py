"""The caption metrics (COCO protocol, CLIPScore) and `clipcap eval` without the terminal."""
