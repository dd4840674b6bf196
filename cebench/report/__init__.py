"""Reports of a run, as a sub-package: results.csv and env.json in, Markdown, HTML and figures out.

write.py decides where the files go and writes them (`write_reports`); data.py turns the rows into
tables, with accuracy.py, roofline.py, stability.py and table1.py for the tables of their own;
trust.py and verdicts.py decide who may be recommended; md.py and html.py (with templates/) lay
it out; plots.py and plots_tp.py draw the figures. Nothing here measures: every figure in a report
traces to a row.
"""
