"""The cook: the driver (`driver`: MLflow query, checks, logging, registration), the build in a
Ray task on its device (`build`), `soup cook --plan` (`plan`), forward passes and bytes per phase
(`meter`), cooks of one sweep at once (`locking`), and what people read (`report`: tables, the
verdict, the figure).

May import: config, data, train, soups, record, runtime.
"""
