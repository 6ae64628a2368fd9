"""Object detection: RetinaNet on COCO (mmdet 2.11 recipe): the task, its step, schedule, evaluation and predict."""
