# view_misplaced.kt: `view` on an ensemble, of the wrong kind, an empty choice, and an own view
# of images that are never augmented (a warning)
# expect: E361 E400 E403 W360
graph view_misplaced
data digits { val_split = 300  augment = none }
node a : cnn_tiny [target, view=own]
node b : cnn_tiny [view=3]
node c : mlp [view=choice()]
node e : ensemble(b, c) [view=own]
e -> a : through
label -> a : through
label -> b : through
label -> c : through
