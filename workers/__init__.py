"""Agent definitions kept in the checkout (not installed): the demo team in workers.demo.

Run yours with `handoff --app workers.yourmodule ...`, or point --app at any module.
"""
