"""What people and programs use: the command line (and, later, the web app and local API).

Faces import only the `node` facade.
"""
