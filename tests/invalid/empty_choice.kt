# empty_choice.kt: a choice with nothing to choose from
# expect: E403
graph empty_choice
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : choice()
label -> a : through
label -> b : through
b     -> a : through
