from famfind.cli import run

run()
