# choice_of_non_names.kt: the options of a model or gate choice must be names
# expect: E400 E400
graph choice_of_non_names
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : choice(cnn_small, 3)
label -> a : through
label -> b : choice(through, "correct")
b     -> a : through
