"""DragCanvas on Ray Serve: one ``Editor`` per replica, requests routed by the image's content hash.

The only package that imports ``ray`` (``pip install -r requirements-ray.txt``).

    python -m editing.serve --model tiny --replicas 2          # a local Ray cluster, blocks until Ctrl-C
    python app.py --backend ray                                 # the web app as front end (same machine)

``deployment.py`` is the replica (an Editor behind a streaming Serve method), ``client.py`` the front end's
stand-in for the Editor (``RemoteEditor``) and the batch seam ``map_edits``, ``cluster.py`` joining or starting a
cluster and checking it can hold the replicas. docs/SERVING.md explains the routing.
"""
APP_NAME = "dragcanvas"
