"""Start the vitft web app: ``python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS]
[--data-root DIR] [--runs-dir DIR] [--max-upload-mb N] [--uploads-quota-mb N] [--no-browser]``."""

import argparse

from vitft_app.server import add_server_arguments, launch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="vitft: fine-tune a Vision Transformer from the browser.")
    add_server_arguments(parser)
    launch(parser.parse_args())
