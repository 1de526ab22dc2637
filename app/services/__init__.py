"""Domain services: the rules of PapCAD, free of HTTP. Each takes a Session and an Actor."""
