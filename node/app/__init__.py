"""The services between the pure core and the faces: records, delivery, intake, contacts, patients, discovery.

Each service is built from an explicit ports object (node/app/ports.py), never from the Node facade.
"""
