# ensemble_choice_options.kt: choices of ensembles: mixed with a model, none for a model, the target or a member
# expect: E306 E335 E335 E335 E335
graph ensemble_choice_options
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : mlp
node e : choice(none, ensemble(b, c), mlp)
node d : choice(none, cnn_tiny)
node t : choice(none, ensemble(a, b)) [target]
node f : ensemble(b, e)
label -> d : through
e -> a : through
f -> a : through
t -> a : through
label -> a : through
label -> b : through
label -> c : through
